"""Model code (library): the teacher (``teacher``), the students' network (``student``),
baselines, ranking metrics, the tensor file format (``store``) and the one training function
(``fit``) the train and tune stages run."""
