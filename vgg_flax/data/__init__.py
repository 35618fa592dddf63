"""Input: dataset sources (tfds, the built-in `digits`, image folders), preprocessing
(the paper's crops, scale jittering, colour shift) and the batch streams of `input_pipeline`."""
