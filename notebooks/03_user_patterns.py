# Databricks notebook source
# MAGIC %md
# MAGIC # One user's patterns, explained
# MAGIC For one user (`USER_ID` below; the first scored user when empty): their recent events,
# MAGIC the items the champion of their segment recommends, the sequential rule behind each and
# MAGIC the past events that explain it (`gold/user_patterns`, latest run). Locally:
# MAGIC `.venv/bin/python notebooks/03_user_patterns.py` (after `patternlake score`).

# COMMAND ----------

import os

from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.lake import Lake
from patternlake.spark import get_spark

config = load_config()  # on Databricks: load_config("databricks")
spark = get_spark(config.spark)
lake = Lake(spark, config.lake)
USER_ID = os.environ.get("USER_ID", "")  # on Databricks: dbutils.widgets.get("user_id")

# COMMAND ----------

patterns = lake.read("user_patterns")
run_id = patterns.agg(F.max_by("run_id", "scored_at")).first()[0]
latest = patterns.where(F.col("run_id") == run_id)
user = USER_ID or latest.orderBy("user_id").first()["user_id"]
print(f"run {run_id}, user {user}")

# COMMAND ----------

# MAGIC %md ## Their last events

# COMMAND ----------

lake.read("silver_events").where(F.col("user_id") == user).orderBy(F.desc("event_time")).select(
    "event_time", "event_type", "item_id"
).show(10, truncate=False)

# COMMAND ----------

# MAGIC %md ## Next likely items, the rule behind each, the events that explain it

# COMMAND ----------

rows = latest.where(F.col("user_id") == user).orderBy("rank").collect()
for r in rows:
    p = r.pattern
    rule = (
        f"{' -> '.join(p.antecedent)} => {p.consequent} (confidence {p.confidence:.2f}, lift {p.lift:.1f})"
        if p
        else "-"
    )
    why = ", ".join(
        f"{e.item_id} ({e.events_ago} ago, {e.weight:.0%})" for e in r.explanation or []
    )
    print(
        f"{r.rank:2d}. {r.item_id:8s} score {r.score:7.3f} by {r.model_name} v{r.model_version}"
        f"{' (fallback)' if r.fallback else ''}"
    )
    print(f"    rule: {rule}")
    print(f"    because of: {why or '-'}")
