"""patternlake: personalized pattern discovery on the lakehouse.

The package is made of three kinds of parts (``tests/test_architecture.py`` checks the
imports):

* **library** (``LIBRARY``): shared code any stage may import; it imports only other
  library modules, never a stage.

  - ``config``, ``errors``, ``spark``, ``times``: conf, the user-error type, the Spark
    session, time parsing;
  - ``lake/``: named Delta tables under one root (delta-spark);
  - ``sequence_schema``: the vocabulary of ``user_sequences`` (event types, gap buckets,
    ``max_len``; recorded with the table) and the evaluation rule;
    ``sequence_reader``: decoding a pinned version of ``user_sequences`` into arrays and
    training batches;
  - ``models/``: model code: the teacher network (``teacher``), the students' network
    (``student``), baselines, ranking metrics, the tensor file format (``store``) and the one
    training function every backend runs (``fit``) and what it trains on (``train_spec``:
    the ``TrainSpec`` built from the lake and conf);
  - ``registry``: the MLflow registry (teacher, students, champions) and experiment;
  - ``model_selection``: pruning, Pareto front and choice among trained configurations;
  - ``decisions``: reading ``model_decisions`` (the gates' verdicts per segment);
  - ``stages``: how a stage is declared (``Stage``, ``Option``);
  - ``progress``: progress bars of long driver loops, on a terminal only.

* **stages**: one package per stage (or command), importing library modules and itself
  only: ``synthetic`` (generate), ``ingest``, ``quality`` (validate), ``features``
  (featurize), ``items`` (item stats), ``segments`` (segment), ``patterns`` (mine),
  ``tuning`` (tune teacher), ``training`` (train), ``students`` (distill, compress, models),
  ``evaluation`` (evaluate), ``scoring`` (score), ``monitoring`` (monitor), ``privacy``
  (forget), ``reporting`` (report). Stages talk through tables (and the model registry), never through each other's
  code.

* **shells** (``SHELLS``): ``pipeline`` (collects every stage package's declarations,
  ``<package>/stage.py``, and runs them), ``export`` (a pipeline as spark-submit commands or
  a Databricks bundle) and ``cli``; they may import every stage.
"""

__version__ = "0.1.0"

LIBRARY = frozenset(
    {
        "config",
        "errors",
        "spark",
        "times",
        "lake",
        "sequence_schema",
        "sequence_reader",
        "models",
        "registry",
        "model_selection",
        "decisions",
        "progress",
        "stages",
    }
)
SHELLS = frozenset({"pipeline", "export", "cli"})
