FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY trio_portfolio ./trio_portfolio
RUN pip install --no-cache-dir .
EXPOSE 8000
USER nobody
ENTRYPOINT ["trio-portfolio"]
CMD ["serve"]
