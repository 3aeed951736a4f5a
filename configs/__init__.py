"""Configuration files (ml_collections); each has get_config()."""
