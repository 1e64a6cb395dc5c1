// ESLint (flat config): typescript-eslint's recommended rules over src/ and test/, formatting left to Prettier.
import js from '@eslint/js'
import tseslint from 'typescript-eslint'

export default tseslint.config(
  { ignores: ['dist/', 'build/', 'node_modules/', 'docs/api/', 'bench/**/*.mjs', 'test/fuzz/**/*.mjs'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: 'readonly', console: 'readonly', Buffer: 'readonly', __dirname: 'readonly' } },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      // `cond && act()` and `c ? a() : b()` as statements are the house style in the walkers
      '@typescript-eslint/no-unused-expressions': ['error', { allowShortCircuit: true, allowTernary: true }],
      // messages and names are escaped by matching control characters on purpose
      'no-control-regex': 'off',
    },
  },
)
