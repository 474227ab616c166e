#!/usr/bin/env bash
# Start a Spark standalone master or worker in the foreground from the project image.
#   spark-node.sh master            -> spark://$SPARK_MASTER_HOST:7077, UI on 8080
#   spark-node.sh worker URL        -> registers with URL, cores/memory from SPARK_WORKER_CORES/_MEMORY
set -euo pipefail
role=${1:?usage: spark-node.sh master|worker [master-url]}
spark_class="${SPARK_HOME:?SPARK_HOME is not set}/bin/spark-class"
case "$role" in
  master)
    exec "$spark_class" org.apache.spark.deploy.master.Master \
      --host "${SPARK_MASTER_HOST:-$(hostname)}" --port "${SPARK_MASTER_PORT:-7077}" \
      --webui-port "${SPARK_MASTER_WEBUI_PORT:-8080}"
    ;;
  worker)
    exec "$spark_class" org.apache.spark.deploy.worker.Worker \
      --cores "${SPARK_WORKER_CORES:-2}" --memory "${SPARK_WORKER_MEMORY:-2g}" \
      --webui-port "${SPARK_WORKER_WEBUI_PORT:-8081}" --work-dir "${SPARK_WORKER_DIR:-/opt/spark-work}" \
      "${2:?usage: spark-node.sh worker spark://host:7077}"
    ;;
  *)
    echo "unknown role: $role (expected master or worker)" >&2
    exit 2
    ;;
esac
