"""The training presets (``*.toml`` here), installed as the package ``gsavatar.presets``.

Read them through :func:`gsavatar.config.load_preset` and :func:`gsavatar.config.available_presets`.
"""
