-- Run by the postgres image on first start (empty volume): the Prefect server's database.
CREATE DATABASE prefect OWNER mlops;
