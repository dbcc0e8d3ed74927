"""Training data: readers behind one interface, augmentations, SUEM copy-paste, click simulation."""
