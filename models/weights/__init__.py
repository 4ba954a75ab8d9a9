"""Where weights are found besides an operator's directory: the built-in phantom model shipped in
``models/assets``, and the switch that keeps diffusers and transformers off the model hub. Below
the diffusion machinery, which reads them."""
