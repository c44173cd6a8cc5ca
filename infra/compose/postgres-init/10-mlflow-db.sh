#!/bin/sh
# Runs once, when the Postgres volume is initialised: a database and a role for MLflow's backend
# store next to Prefect's (POSTGRES_DB=prefect). The password comes from MLFLOW_DB_PASSWORD.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
