"""Weights in and out: torchvision (`weights`) and Keras (`keras_weights`, `keras_files`)
importers and what they share (`name_maps`), their architectures (`architecture`),
exporters (`weights_export`), loading any source (`hub`) and initialising a train state
from one (`transfer`)."""
