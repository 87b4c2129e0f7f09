"""The tune stage: architecture and hyperparameter search for the teacher
(`patternlake tune teacher`, table ``teacher_tuning``); see ``tune_teacher``."""
