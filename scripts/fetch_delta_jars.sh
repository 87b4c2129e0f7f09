#!/usr/bin/env bash
# Fetch the Delta Lake Spark jars (io.delta:delta-spark_2.13 and its runtime dependencies)
# with Maven into the project cache, for the delta-spark version installed in the venv.
# Spark itself already ships the Scala library and ANTLR runtime, so those are left out.
# The folder is reused when present; `patternlake.spark.get_spark` puts its jars on the
# classpath of every embedded session.
#
# usage: scripts/fetch_delta_jars.sh PYTHON     (prints the jar folder on stdout)
set -euo pipefail
PY=${1:?usage: fetch_delta_jars.sh PYTHON}
CACHE=${PATTERNLAKE_CACHE:-$HOME/.cache/patternlake}
VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("delta-spark"))')
SCALA=2.13
OUT=${PATTERNLAKE_DELTA_JARS:-"$CACHE/jars/delta-spark_$SCALA-$VERSION"}  # where get_spark looks
if [ -f "$OUT/.complete" ]; then
  echo "$OUT"
  exit 0
fi
command -v mvn >/dev/null 2>&1 || {
  echo "fetch_delta_jars.sh: Maven (mvn) is needed to fetch io.delta:delta-spark_$SCALA:$VERSION" >&2
  exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>patternlake</groupId>
  <artifactId>delta-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.delta</groupId>
      <artifactId>delta-spark_$SCALA</artifactId>
      <version>$VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
echo "fetching io.delta:delta-spark_$SCALA:$VERSION with Maven" >&2
rm -rf "$OUT" && mkdir -p "$OUT"
mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
  -DexcludeGroupIds=org.scala-lang,org.antlr -DoutputDirectory="$OUT" >&2
ls "$OUT"/delta-spark_"$SCALA"-"$VERSION".jar "$OUT"/delta-storage-"$VERSION".jar >/dev/null
touch "$OUT/.complete"
echo "$OUT"
