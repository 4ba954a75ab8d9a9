"""Where weights come from besides an operator's directory: the tiny random-weight model built
from configs, the built-in phantom model shipped in ``models/assets``, and the switch that keeps
diffusers and transformers off the model hub."""
