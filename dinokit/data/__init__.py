"""Data: image folders, transforms, masks, DAVIS layout, synthetic data sets."""
