{
  "targets": [
    {
      "target_name": "seekhole",
      "sources": ["native/seekhole.c"]
    },
    {
      "target_name": "zdeflate",
      "sources": ["native/zdeflate.c"],
      "libraries": ["<!@(node native/find-libz.cjs)"],
      "conditions": [
        ["OS=='linux'", { "ldflags": ["-Wl,--exclude-libs,ALL"] }]
      ]
    }
  ]
}
