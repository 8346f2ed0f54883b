# The image every Airflow component of docker-compose.yaml runs: official Airflow + this project.
FROM apache/airflow:3.3.2-python3.11

COPY --chown=airflow:root requirements.txt /opt/recsys/requirements.txt
RUN pip install --no-cache-dir -r /opt/recsys/requirements.txt

COPY --chown=airflow:root recmodel /opt/recsys/recmodel
COPY --chown=airflow:root sql /opt/recsys/sql
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
ENV PYTHONPATH=/opt/recsys \
    RECSYS_HOME=/opt/recsys/home
