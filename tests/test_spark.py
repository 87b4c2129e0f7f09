"""Session helpers: scoped SQL settings and Spark job labels."""

from patternlake.spark import job_label, sql_settings


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
