"""Checkpoints: saving and loading training state, and conversion to and from other formats (hf: CLIPModel)."""
