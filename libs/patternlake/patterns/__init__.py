"""The ``mine`` stage: ``user_sequences`` + ``segments`` -> ``segment_patterns`` (sequential
and co-occurrence rules per segment); ``transforms`` holds the transforms, ``mine`` the I/O shell."""
