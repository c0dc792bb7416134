"""Optional integrations (import the submodule you need; `import ewc` imports none of them)."""
