"""Weights in and out: torchvision (`weights`) and Keras (`keras_weights`, `keras_files`)
importers, their architectures (`architecture`), exporters (`weights_export`), loading
any source (`hub`) and initialising a train state from one (`transfer`)."""
