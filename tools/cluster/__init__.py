"""Tools of the one-node test cluster: build.sh (binaries), images.py (images without a registry)."""
