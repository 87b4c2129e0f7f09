"""The one place that builds a Spark session.

Locally (``spark.master: local[2]``) it starts an embedded Spark with the UI off, small
shuffle partition counts and Arrow on. Under ``spark-submit`` or on Databricks, where a
session or a ``--master`` already exists, it uses that and only adds the settings that
can change at run time; the cluster's own settings win.

Every session runs Delta Lake (the lake's engine, ``delta-spark``): an embedded session gets
the jars that ``make setup`` fetched with Maven (``scripts/fetch_delta_jars.sh``, under
``$PATTERNLAKE_CACHE/jars``) and Delta's SQL extension and catalog; a session started
elsewhere must bring them (Databricks does; ``spark-submit --packages
io.delta:delta-spark_2.13:<version>`` and the two ``--conf`` lines of ``DELTA_SQL`` do).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from py4j.protocol import Py4JError
from pyspark.sql import DataFrame, SparkSession

from patternlake.config import SparkConfig
from patternlake.errors import PatternlakeError
from patternlake.progress import enabled as progress_enabled

log = logging.getLogger(__name__)


DELTA_SCALA = "2.13"
# Delta's SQL extension (MERGE, DELETE, VACUUM, OPTIMIZE, REORG) and catalog: static settings,
# fixed when a session starts.
DELTA_SQL = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
DELTA_JARS_ENV = "PATTERNLAKE_DELTA_JARS"


def delta_version() -> str:
    """The delta-spark release installed (its jars must be the same release)."""
    return package_version("delta-spark")


def delta_jar_dir() -> Path:
    """Where ``scripts/fetch_delta_jars.sh`` puts the Delta jars: ``$PATTERNLAKE_DELTA_JARS``,
    else ``${PATTERNLAKE_CACHE:-~/.cache/patternlake}/jars/delta-spark_2.13-<version>``."""
    if os.environ.get(DELTA_JARS_ENV):
        return Path(os.environ[DELTA_JARS_ENV])
    cache = os.environ.get("PATTERNLAKE_CACHE") or str(Path.home() / ".cache" / "patternlake")
    return Path(cache) / "jars" / f"delta-spark_{DELTA_SCALA}-{delta_version()}"


def _delta_jars() -> list[str]:
    folder = delta_jar_dir()
    jars = sorted(str(p) for p in folder.glob("*.jar")) if folder.is_dir() else []
    if not any(Path(j).name.startswith("delta-spark_") for j in jars):
        raise PatternlakeError(
            f"the Delta Lake jars (io.delta:delta-spark_{DELTA_SCALA}:{delta_version()}) are not "
            f"in {folder}: run `make setup` (scripts/fetch_delta_jars.sh fetches them with Maven)"
        )
    return jars


def _missing_delta(spark: SparkSession) -> str | None:
    """Why ``spark`` cannot run the lake (no jars, or no Delta SQL extension); None when it can."""
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return None  # Databricks runtimes carry Delta built in
    submit = f"--packages io.delta:delta-spark_{DELTA_SCALA}:{delta_version()} " + " ".join(
        f"--conf {k}={v}" for k, v in DELTA_SQL.items()
    )
    if not delta_jars_loaded(spark):
        return f"the Spark session has no Delta Lake jars: start it with {submit}"
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    if DELTA_SQL["spark.sql.extensions"] not in extensions:
        return f"the Spark session lacks Delta's SQL extension: start it with {submit}"
    return None


def get_spark(conf: SparkConfig) -> SparkSession:
    """Return the active session (Databricks, spark-submit) or build one from ``conf``, with
    Delta Lake configured (see the module's docstring)."""
    # Executors must run the same Python as the driver (the project's venv).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    active = SparkSession.getActiveSession()
    runtime = {
        "spark.sql.shuffle.partitions": str(conf.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Delta rebuilds a table's state in this many partitions (default 50 tiny tasks)
        "spark.databricks.delta.snapshotPartitions": str(conf.shuffle_partitions),
        **conf.conf,
    }
    if active is not None:
        problem = _missing_delta(active)
        if problem:
            raise PatternlakeError(problem)
        for key, value in runtime.items():
            _try_set(active, key, value)
        return active

    builder = SparkSession.builder.appName(conf.app_name)
    # Only force a master when conf names one and spark-submit has not already set it.
    if conf.master and "spark.master" not in _submit_conf():
        builder = builder.master(conf.master)
    if (conf.master or "").startswith("local"):
        # one host: no "hostname resolves to a loopback address" warning at every start
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    static = {
        "spark.ui.enabled": str(conf.ui).lower(),
        # Spark's own stage progress bar (scoring, featurize, ...) only for a person watching,
        # like ours (patternlake.progress: a terminal, PATTERNLAKE_PROGRESS=0 turns both off)
        "spark.ui.showConsoleProgress": str(progress_enabled()).lower(),
        "spark.driver.extraJavaOptions": "-Duser.timezone=UTC "
        f"-Dlog4j2.configurationFile={_log4j_file().as_uri()}",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
    }
    if conf.driver_memory and "spark.driver.memory" not in _submit_conf():
        static["spark.driver.memory"] = conf.driver_memory
    settings = {**static, **runtime, **_delta_settings(conf.conf)}
    for key, value in settings.items():
        builder = builder.config(key, value)
    _start_jvm({**builder._options, **settings})  # type: ignore[attr-defined]
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    problem = _missing_delta(spark)
    if problem:
        raise PatternlakeError(problem)
    log.info("spark %s master=%s", spark.version, spark.sparkContext.master)
    return spark


LOG4J = """# patternlake: Spark's log at WARN without the start-up notices a user cannot act on
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.native.name = org.apache.hadoop.util.NativeCodeLoader
logger.native.level = error
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
logger.prefixspan.name = org.apache.spark.mllib.fpm.PrefixSpan
logger.prefixspan.level = error
# "Truncated the string representation of a plan": a debug string (explain shows the rest)
logger.truncated.name = org.apache.spark.sql.catalyst.util.SparkStringUtils
logger.truncated.level = error
# "Failed to load implementation from: ...JNIBLAS": no native BLAS, MLlib uses Java's
logger.netlib.name = dev.ludovic.netlib
logger.netlib.level = error
"""


# The JVM prints this at every start, to stderr, before any code of Spark's runs: Spark 4 adds
# ``--add-modules=jdk.incubator.vector`` to every driver and the JVM has no option to quiet
# the notice.
JVM_NOTICE = b"WARNING: Using incubator modules:"
# Copies the JVM's stderr to this process's stderr as it comes, less a first line that is
# JVM_NOTICE. A process of its own, so that it outlives this one while the JVM shuts down.
_STDERR_FILTER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the driver, not the copy
notice = sys.argv[1].encode()
def write(data):
    while data:
        data = data[os.write(1, data):]
first = b""
while len(first) < len(notice) and notice.startswith(first):
    byte = os.read(0, 1)
    if not byte:
        break
    first += byte
if first == notice:
    while not first.endswith(b"\\n"):
        byte = os.read(0, 1)
        if not byte:
            break
        first += byte
else:
    write(first)
while True:
    data = os.read(0, 65536)
    if not data:
        break
    write(data)
"""


def _start_jvm(options: dict[str, str]) -> None:
    """Start the JVM of an embedded session (what ``getOrCreate`` would start with
    ``options``) with its stderr through a filter that drops the JVM's incubator-modules
    notice; everything else the JVM writes reaches stderr unchanged. Nothing is done when a
    JVM exists already (spark-submit, an earlier session) or no filter process can start."""
    import subprocess

    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if SparkContext._gateway is not None or "PYSPARK_GATEWAY_PORT" in os.environ:
        return
    read, write = os.pipe()
    try:
        try:
            subprocess.Popen(
                [sys.executable, "-c", _STDERR_FILTER, JVM_NOTICE.decode()],
                stdin=read,
                stdout=2,  # this process's stderr (a file descriptor: pytest replaces sys.stderr)
                close_fds=True,
            )
        except OSError as exc:
            log.debug("no stderr filter for the JVM (%s)", exc)
            return
        os.close(read)
        read = -1
        conf = SparkConf(loadDefaults=False).setAll(list(options.items()))
        gateway = launch_gateway(conf, popen_kwargs={"stderr": write})
    finally:
        os.close(write)
        if read != -1:
            os.close(read)
    SparkContext._ensure_initialized(gateway=gateway)


def _log4j_file():
    """The log4j2 configuration of an embedded Spark (written once per user and version)."""
    import hashlib
    import tempfile
    from pathlib import Path

    digest = hashlib.sha1(LOG4J.encode()).hexdigest()[:8]
    path = Path(tempfile.gettempdir()) / f"patternlake-log4j2-{os.getuid()}-{digest}.properties"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(LOG4J)
        tmp.replace(path)
    return path


def _delta_settings(conf: dict[str, str]) -> dict[str, str]:
    """Delta's SQL extension added to the extensions already set (conf, spark-submit,
    spark-defaults), Delta's catalog unless another is set, and the jars of this installation
    added to ``spark.jars`` unless conf or spark-submit (whose JVM runs this driver already:
    ``--packages`` / ``--jars``) brings Delta itself."""
    from pyspark import SparkConf

    given = {**dict(SparkConf().getAll()), **conf}  # spark-submit's and spark-defaults' too
    extensions = [e for e in given.get("spark.sql.extensions", "").split(",") if e.strip()]
    if DELTA_SQL["spark.sql.extensions"] not in extensions:
        extensions.append(DELTA_SQL["spark.sql.extensions"])
    out = {"spark.sql.extensions": ",".join(extensions)}
    catalog = "spark.sql.catalog.spark_catalog"
    if catalog not in given:
        out[catalog] = DELTA_SQL[catalog]
    elif given[catalog] != DELTA_SQL[catalog]:
        log.warning("spark_catalog is %s, not Delta's catalog: kept", given[catalog])
    if not _brings_delta(conf) and "PYSPARK_GATEWAY_PORT" not in os.environ:
        out["spark.jars"] = ",".join(filter(None, [given.get("spark.jars"), *_delta_jars()]))
    return out


def _brings_delta(conf: dict[str, str]) -> bool:
    """True when the settings or spark-submit's arguments already name the Delta jars."""
    named = " ".join(conf.get(k, "") for k in ("spark.jars", "spark.jars.packages"))
    return "delta-spark" in named or "delta-spark" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")


def _submit_conf() -> dict[str, str]:
    """Settings spark-submit passed to this driver (empty when run as plain Python)."""
    raw = os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    out: dict[str, str] = {}
    if "--master" in raw:
        out["spark.master"] = "submit"
    if "--driver-memory" in raw:
        out["spark.driver.memory"] = "submit"
    # Under spark-submit the JVM exists already and its conf is visible through this env var.
    if os.environ.get("SPARK_ENV_LOADED") or os.environ.get("PYSPARK_GATEWAY_PORT"):
        out.setdefault("spark.master", "submit")
        out.setdefault("spark.driver.memory", "submit")
    return out


def _try_set(spark: SparkSession, key: str, value: str) -> None:
    try:
        spark.conf.set(key, value)
    except Exception as exc:  # static or cluster-locked settings cannot change at run time
        log.debug("kept cluster setting %s (%s)", key, exc)


def delta_jars_loaded(spark: SparkSession) -> bool:
    """True when the Delta Lake Spark jars are on the classpath (Databricks, --packages)."""
    try:
        jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
        # Spark's class loader: it holds spark.jars, which Class.forName from Py4J does not see
        jvm.org.apache.spark.util.Utils.classForName("io.delta.tables.DeltaTable", True, False)
        return True
    except Exception:
        return False


@contextmanager
def job_label(spark: SparkSession, text: str) -> Iterator[None]:
    """Name the Spark jobs run inside the block (Spark UI, event log, ``bench/sparkprofile.py``):
    ``validate 2026...: write silver_events``. Nested labels are joined with ": "."""
    sc = spark.sparkContext
    before = sc.getLocalProperty("spark.job.description")
    sc.setJobDescription(f"{before}: {text}" if before else text)
    try:
        yield
    finally:
        sc.setLocalProperty("spark.job.description", before)  # None removes it


_SETTINGS_LOCK = threading.RLock()


@contextmanager
def sql_settings(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Spark SQL settings for the jobs planned and run inside the block, restored after it.
    A session's settings are shared by its threads: blocks run one at a time per process,
    so a setting never leaks into another thread's operation."""
    with _SETTINGS_LOCK:
        before = {k: spark.conf.get(k, None) for k in settings}
        for k, v in settings.items():
            spark.conf.set(k, v)
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    spark.conf.unset(k)
                else:
                    spark.conf.set(k, v)


# Constraint propagation infers filters from every predicate of a plan; over validate's wide
# reason array (one branch per expectation) its cost explodes: the bad-input corpus took over
# 10 minutes to plan with it and 8 s to validate without it.
NO_CONSTRAINT_PROPAGATION = {"spark.sql.constraintPropagation.enabled": "false"}


def shuffled_once(df: DataFrame, observed: str | None = None) -> tuple[DataFrame, dict[str, Any]]:
    """Run ``df`` up to its last shuffle now, once, and return a DataFrame over that shuffle's
    output which any number of later jobs read without running what came before it again:
    Spark keeps the shuffle files while the returned DataFrame is referenced, and each job
    over it only re-reads them. The returned DataFrame keeps ``df``'s partitioning (like
    ``Dataset.checkpoint``, including a partition count that adaptive execution coalesced),
    so a ``df`` ending in ``repartition(key)`` feeds windows and aggregations by ``key`` with
    no second shuffle. This is how one pass over a batch feeds
    two tables (validate's quarantine and silver writes) without caching its rows.

    ``observed`` names a ``df.observe(observed, ...)`` made before the shuffle: its metrics,
    complete once the shuffle has run, are returned as a dict (empty when ``observed`` is
    None). Like any metric of a transformation, they count a map task again if Spark has to
    rerun it (a lost executor), which callers' row invariants detect.

    Classic Spark only: it works on the JVM query execution, which Spark Connect does not
    expose."""
    jdf = getattr(df, "_jdf", None)
    if jdf is None:
        raise PatternlakeError(
            "patternlake needs a classic Spark session (a JVM driver); Spark Connect sessions "
            "are not supported"
        )
    session = df.sparkSession
    jvm = session.sparkContext._jvm  # type: ignore[attr-defined]
    jsession = session._jsparkSession  # type: ignore[attr-defined]
    execution = jdf.queryExecution()
    rdd = execution.toRdd()  # plans and runs every shuffle map stage (adaptive execution)
    metrics: dict[str, Any] = {}
    if observed is not None:
        row = execution.observedMetrics().get(observed)
        if not row.isDefined():
            raise RuntimeError(f"no observed metrics named {observed!r} in the plan")
        metrics = json.loads(row.get().json())
    try:
        plan = execution.executedPlan()
        if plan.getClass().getSimpleName() == "AdaptiveSparkPlanExec":
            plan = plan.executedPlan()  # the final plan, now that its stages have run
        none = jvm.scala.Option.empty()
        relation = getattr(jvm.org.apache.spark.sql.execution, "LogicalRDD$").__getattr__("MODULE$")
        logical = relation.apply(
            execution.analyzed().output(),
            rdd,
            plan.outputPartitioning(),
            plan.outputOrdering(),
            False,
            none,
            jsession,
            none,
            none,
        )
        out = jvm.org.apache.spark.sql.classic.Dataset.ofRows(jsession, logical)
    except Py4JError as exc:  # another Spark version's internals: same rows, partitioning lost
        log.warning(
            "shuffled_once: keeping the partitioning failed (%s); later jobs reshuffle", exc
        )
        out = jsession.internalCreateDataFrame(rdd, jdf.schema(), False)
    return DataFrame(out, session), metrics
