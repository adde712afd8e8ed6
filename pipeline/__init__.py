"""Data pipeline: storage, shards, unpaired streams, transforms.

Importing the package lets webdataset open every fsspec URL (webdataset 1.x has no native s3 support).
"""

from pipeline.storage import register_webdataset_opener

register_webdataset_opener()
