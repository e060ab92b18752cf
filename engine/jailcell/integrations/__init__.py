"""Integrations: jailcell as a tool for LLM loops (tools), and as an MCP server (mcp).

Each integration imports its framework lazily and says how to install it when it is missing.
"""
