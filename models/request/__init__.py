"""What a counterfactual request is, before any model is loaded: prompts, findings, edit
parameters, their validation against the CLIP tokenizer, the result's declaration and the
engine's errors. Torch-free, so the API process validates requests without loading torch."""
