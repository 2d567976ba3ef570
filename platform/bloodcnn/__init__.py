"""bloodcnn: train and serve a MobileNetV2 acute-lymphoblastic-leukemia classifier on Ray."""

__version__ = "0.1.0"
