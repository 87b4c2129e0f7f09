"""The ``segment`` stage: ``user_features`` -> ``segments``, ``segment_models`` (KMeans with
stable ids); ``transforms`` holds the transforms, ``segment`` the I/O shell."""
