"""The train stage: the teacher on a pinned version of ``user_sequences``, on one of the
backends, logged and registered in MLflow (``train``; the training loop itself is
``models.fit``)."""
