from reid_jax.data import cuhk01, cuhk03, cuhk_sysu, market1501, mars  # noqa: F401  (registers the builders)
from reid_jax.data import folder, msmt17  # noqa: F401  (registers folder, msmt17)
from reid_jax.data import synthetic  # noqa: F401  (registers synthetic_reid)
from reid_jax.data import synthetic_video  # noqa: F401  (registers synthetic_video_reid)
