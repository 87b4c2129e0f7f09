"""The ``segment`` stage: ``user_features`` -> ``segments``, ``segment_models`` (KMeans with
stable ids); ``nodes`` holds the transforms, ``kmeans`` the I/O shell."""
