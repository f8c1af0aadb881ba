"""Image-caption data for BK-SDM distillation, through 🤗 `datasets`, in three steps:

- `sources`: what ``--data`` names (image-caption folders, shard folders, saved or hub datasets,
  streams) opened as a dataset, its columns picked, its image files checked up front;
- `decode`: an image cell -> a fully decoded, upright RGB image (personalize's decoding), then the
  BK-SDM preprocessing -> a [-1, 1] tensor;
- `batches`: batches addressed by number (exact resume), undecodable examples skipped and counted.
"""
