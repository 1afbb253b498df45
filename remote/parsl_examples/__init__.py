"""Example Parsl configurations for ``remote.parsl_config_file`` (copy one and edit)."""
