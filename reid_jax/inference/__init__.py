"""Using a trained model outside its benchmark: load a run, embed images, search."""
