"""Webb's xDS control plane: resource builders, snapshot cache, ADS server, Envoy supervisor.

The ``xds-protos`` wheel also installs a top-level ``xds`` package (the CNCF ``xds.core``,
``xds.type`` ... protos that Envoy's protos import). Extending ``__path__`` lets both live
under one name: our modules from this folder, theirs from site-packages. This folder must
come first on ``sys.path`` (``mesh/__init__.py`` sees to it for the CLI; pytest runs from
the repository root).
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
