"""What judges an image: the CLIP directional score S_CLIP and the finding classifier."""
