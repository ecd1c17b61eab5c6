"""syndiff_lib: single-step latent-diffusion polyp segmentation (SynDiff), as a lesson.

Read the modules in this order; each names the notebook that teaches it:
config -> data -> autoencoder -> unet -> diffusion -> train -> pipeline -> metrics.
"""

__version__ = "0.1.0"
