# Databricks notebook source
# MAGIC %md
# MAGIC # Explore the patternlake lake
# MAGIC Every table is a Delta table under `lake.root`. This notebook registers them as SQL views
# MAGIC and looks at what the daily pipeline produced. Locally: `.venv/bin/python notebooks/01_explore_lake.py`.

# COMMAND ----------

from patternlake.config import load_config
from patternlake.lake import Lake
from patternlake.spark import get_spark

config = load_config()  # on Databricks: load_config("databricks")
spark = get_spark(config.spark)
lake = Lake(spark, config.lake)
print("views:", lake.register_views())

# COMMAND ----------

# MAGIC %md ## Data quality: batches, quarantine reasons

# COMMAND ----------

spark.sql("""
    SELECT batch_id, status, bronze_rows, silver_rows, quarantined_rows, duplicate_rows, invalid_share
    FROM validation_results ORDER BY validated_at DESC
""").show(truncate=False)
spark.sql("""
    SELECT reason, count(*) AS rows FROM quarantine_events LATERAL VIEW explode(reasons) r AS reason
    GROUP BY reason ORDER BY rows DESC
""").show()

# COMMAND ----------

# MAGIC %md ## Segments and their strongest sequential rules

# COMMAND ----------

spark.sql(
    "SELECT segment_id, count(*) AS users FROM segments GROUP BY segment_id ORDER BY segment_id"
).show()
spark.sql("""
    SELECT segment_id, antecedent, consequent, support, confidence, lift FROM (
        SELECT segment_id, concat_ws(' -> ', antecedent) AS antecedent, consequent,
               round(support, 3) AS support, round(confidence, 2) AS confidence, round(lift, 1) AS lift,
               row_number() OVER (PARTITION BY segment_id ORDER BY lift DESC) AS n
        FROM segment_patterns WHERE kind = 'sequential')
    WHERE n <= 3 ORDER BY segment_id, lift DESC
""").show(truncate=False)

# COMMAND ----------

# MAGIC %md ## Time travel: the item index as of its first version

# COMMAND ----------

print("item_index versions:", [h["version"] for h in lake.history("item_index")])
lake.read("item_index", version=0).orderBy("item_idx").show(5)
