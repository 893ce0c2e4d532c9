"""Webb's own container image (build.py) and the helm that tests its chart (build-helm.sh)."""
