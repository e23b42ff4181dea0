"""Data files shipped with fastenc (see README.md in this folder): ``reviews.tsv``."""
