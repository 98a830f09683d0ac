"""The bundled search spaces (YAML). The wheel ships this folder as the package
autocompress.search_spaces; `--space NAME` picks NAME.yaml from it (see autocompress/space.py)."""
