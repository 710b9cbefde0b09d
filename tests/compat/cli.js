// What the Node drivers share: their command line and the calls every SDK makes.
'use strict'

// Reads `--name value` pairs; every one of `names` is required, nothing else is taken.
function parseArgs(argv, script, names) {
  const usage = `usage: ${script} ${names.map((n) => `--${n} ${n.toUpperCase()}`).join(' ')}`
  const args = {}
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i]
    const value = argv[i + 1]
    if (!names.map((n) => `--${n}`).includes(name) || value === undefined) {
      throw new Error(`${usage} (at ${name})`)
    }
    args[name.slice(2)] = value
  }
  for (const name of names) {
    if (!args[name]) throw new Error(`--${name} is required; ${usage}`)
  }
  return args
}

// The calls every server SDK makes: [method, params]. Every call carries the run marker (in
// properties or traits, in context for alias).
function calls(marker) {
  const userId = `user-${marker}`
  const anonymousId = `anon-${marker}`
  return [
    ['track', { userId, event: 'Application Opened', properties: { compat_run: marker, from_background: false } }],
    ['track', { anonymousId, event: 'Application Opened', properties: { compat_run: marker, from_background: true } }],
    ['identify', { userId, traits: { compat_run: marker, plan: 'plus' } }],
    ['page', { anonymousId, name: 'Home', properties: { compat_run: marker, path: '/' } }],
    ['screen', { userId, name: 'Cart', properties: { compat_run: marker } }],
    ['group', { userId, groupId: `group-${marker}`, traits: { compat_run: marker, name: 'Acme' } }],
    ['alias', { previousId: anonymousId, userId, context: { compat_run: marker } }],
  ]
}

module.exports = { parseArgs, calls }
