{
  "targets": [
    {
      "target_name": "seekhole",
      "sources": ["native/seekhole.c"]
    }
  ]
}
