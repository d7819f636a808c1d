"""Library code for training CLIP-style image-text dual encoders (losses, metrics, training, evaluation)."""
