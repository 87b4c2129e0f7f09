"""Session helpers: scoped SQL settings, Spark job labels, one shuffle read by many jobs."""

from pyspark.sql import Window
from pyspark.sql import functions as F

from patternlake.spark import job_label, shuffled_once, sql_settings


def test_sql_settings_hold_inside_the_block_and_are_restored_after(spark):
    key, unset = "spark.sql.constraintPropagation.enabled", "spark.sql.files.maxRecordsPerFile"
    before = spark.conf.get(key)
    spark.conf.unset(unset)
    try:
        with sql_settings(spark, {key: "false", unset: "123"}):
            assert (spark.conf.get(key), spark.conf.get(unset)) == ("false", "123")
            raise RuntimeError("the block fails")
    except RuntimeError:
        pass
    assert spark.conf.get(key) == before
    assert spark.conf.get(unset) == "0"  # back to Spark's default: it was not set


def test_job_labels_nest_and_are_removed_after_the_block(spark):
    sc = spark.sparkContext
    with job_label(spark, "validate b1"):
        with job_label(spark, "write silver_events"):
            assert (
                sc.getLocalProperty("spark.job.description") == "validate b1: write silver_events"
            )
        assert sc.getLocalProperty("spark.job.description") == "validate b1"
    assert sc.getLocalProperty("spark.job.description") is None


def test_shuffled_once_runs_what_comes_before_the_shuffle_once_for_every_later_job(spark):
    runs = spark.sparkContext.accumulator(0)

    def seen(v):  # a Python UDF: counts every time a row is computed before the shuffle
        runs.add(1)
        return v

    n = 5000
    rows = spark.range(n).select(F.udf(seen, "long")("id").alias("v"), (F.col("id") % 7).alias("k"))
    observed = rows.observe("before", F.count(F.lit(1)).alias("rows"), F.max("v").alias("top"))
    ranked = observed.select(
        "k", "v", F.row_number().over(Window.partitionBy("k").orderBy("v")).alias("_n")
    )
    once, metrics = shuffled_once(ranked, "before")
    assert metrics == {"rows": n, "top": n - 1}
    assert runs.value == n  # the shuffle ran, once, inside shuffled_once
    assert once.filter("_n = 1").count() == 7
    assert sorted(r.v for r in once.filter("_n = 1").collect()) == list(range(7))
    assert once.count() == n
    assert runs.value == n  # three more jobs, none of them recomputed a row
    assert once.schema == ranked.schema


def test_shuffled_once_keeps_the_partitioning_so_a_window_by_the_key_needs_no_second_shuffle(
    spark,
):
    rows = spark.range(2000).select((F.col("id") % 13).alias("k"), F.col("id").alias("v"))
    once, metrics = shuffled_once(rows.repartition("k"))  # adaptive execution coalesces it
    assert metrics == {}
    ranked = once.select("*", F.row_number().over(Window.partitionBy("k").orderBy("v")).alias("n"))
    plan = ranked._jdf.queryExecution().executedPlan().toString()
    assert "Exchange" not in plan, plan
    firsts = {r.k: r.v for r in ranked.filter("n = 1").collect()}
    assert firsts == {k: k for k in range(13)}
