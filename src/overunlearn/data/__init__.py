"""Dataset sources (torchvision roots, Debian Fashion-MNIST, scikit-learn digits) and colouring."""
