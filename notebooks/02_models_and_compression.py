# Databricks notebook source
# MAGIC %md
# MAGIC # Teacher and students: quality and compression trade-offs
# MAGIC The registered teacher's training curve (MLflow), the shared student, its int8 form and
# MAGIC the segment heads next to the teacher on the gate users, pooled and per segment
# MAGIC (`ops/model_report`), and every
# MAGIC promotion decision (`ops/model_decisions`). Locally:
# MAGIC `.venv/bin/python notebooks/02_models_and_compression.py` (after `patternlake run train`).

# COMMAND ----------

from pyspark.sql import functions as F

from patternlake import registry
from patternlake.config import load_config
from patternlake.lake import Lake
from patternlake.spark import get_spark
from patternlake.students.models_report import model_report

config = load_config()  # on Databricks: load_config("databricks")
spark = get_spark(config.spark)
lake = Lake(spark, config.lake)

# COMMAND ----------

# MAGIC %md ## The teacher's training curve

# COMMAND ----------

client = registry.client(config)
version = registry.teacher_version(config)
mv = client.get_model_version(registry.TEACHER, version)
curve = client.get_metric_history(mv.run_id, "valid_ndcg_at_10")
print(f"teacher v{version}: {len(curve)} epochs")
for m in curve:
    print(f"  epoch {m.step:3d}  validation NDCG@10 {m.value:.4f}")

# COMMAND ----------

# MAGIC %md ## The shared student (segment -1: every gate user, pooled), each segment's harm guard
# MAGIC and its head (head / shared student on the segment's gate users)

# COMMAND ----------

model_report(lake, config)  # appends this report to ops/model_report
report = lake.read("model_report")
latest = report.agg(F.max("reported_at")).first()[0]
report.where(F.col("reported_at") == latest).select(
    "segment_id",
    "valid_users",
    "teacher_params",
    "student_params",
    "fp32_bytes",
    "int8_bytes",
    "sparsity",
    "teacher_ndcg_at_10",
    "student_ndcg_at_10",
    "int8_ndcg_at_10",
    "student_ratio_lower_90",
    "student_ratio_upper_90",
    "head_bytes",
    "head_ratio",
    "head_ratio_lower_90",
    "champion",
).orderBy("segment_id").show(truncate=False)

# COMMAND ----------

# MAGIC %md ## Every promotion decision, with its numbers

# COMMAND ----------

lake.read("model_decisions").orderBy("decided_at").select(
    "stage", "segment_id", "model", "variant", "promoted", "champion", "reason"
).show(50, truncate=80)
