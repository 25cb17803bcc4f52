-- Run by the postgres image on first start (empty volume): the databases besides POSTGRES_DB (mlflow).
CREATE DATABASE prefect OWNER mlops;       -- the Prefect server
CREATE DATABASE mlflow_auth OWNER mlops;   -- users and permissions of MLflow's basic-auth app
