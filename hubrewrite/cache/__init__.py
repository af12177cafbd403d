"""The shared pull-through cache's storage: an S3-compatible bucket (bucket.py, bucket_config.py)."""
