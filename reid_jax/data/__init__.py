from reid_jax.data import cuhk01, cuhk03, market1501, mars  # noqa: F401  (registers the builders)
