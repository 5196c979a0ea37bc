// The OpenWhisk JS client (npm `openwhisk`), unchanged, against a minifaas dev server.
// Env: MINIFAAS_APIHOST (http://127.0.0.1:PORT) and MINIFAAS_AUTH (uuid:key). Prints "ALL OK" and exits 0 on success.
'use strict'

const assert = require('assert')
const openwhisk = require('openwhisk')

const apihost = process.env.MINIFAAS_APIHOST
const apiKey = process.env.MINIFAAS_AUTH
if (!apihost || !apiKey) {
  console.error('set MINIFAAS_APIHOST and MINIFAAS_AUTH')
  process.exit(2)
}

const ow = openwhisk({ apihost, api_key: apiKey })
const NAME = 'js-hello'
const CODE = "def main(args):\n    print('hello from', args.get('name'))\n    return {'greeting': 'hi ' + str(args.get('name'))}\n"
let checks = 0

function check (cond, what) {
  assert.ok(cond, what)
  checks += 1
}

async function expectStatus (promise, status, what) {
  try {
    await promise
  } catch (err) {
    check(err.statusCode === status, `${what}: expected HTTP ${status}, got ${err.statusCode} (${err.message})`)
    return err
  }
  throw new Error(`${what}: expected HTTP ${status}, the call succeeded`)
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function waitActivation (id) {
  for (let i = 0; i < 200; i++) {
    try {
      return await ow.activations.get({ name: id })
    } catch (err) {
      if (err.statusCode !== 404) throw err
      await sleep(50)
    }
  }
  throw new Error(`activation ${id} did not end`)
}

async function main () {
  const namespaces = await ow.namespaces.list()
  check(Array.isArray(namespaces) && namespaces.length === 1, 'namespaces.list')

  await ow.actions.delete({ name: NAME }).catch(() => {})
  const created = await ow.actions.create({ name: NAME, action: CODE, kind: 'python:3', params: { name: 'default' } })
  check(created.name === NAME && created.exec.kind === 'python:3', 'actions.create returns the action')
  await expectStatus(ow.actions.create({ name: NAME, action: CODE, kind: 'python:3' }), 409, 'create twice')
  await expectStatus(ow.actions.create({ name: 'js-node', action: 'function main() {}' }), 400, 'nodejs kind')

  const updated = await ow.actions.update({ name: NAME, action: CODE, kind: 'python:3', params: { name: 'world' }, limits: { timeout: 10000 } })
  check(updated.version === '0.0.2' && updated.limits.timeout === 10000, 'actions.update')
  const got = await ow.actions.get({ name: NAME })
  check(got.exec.code === CODE && got.parameters.some(p => p.key === 'name' && p.value === 'world'), 'actions.get')
  const listed = await ow.actions.list({ limit: 50 })
  check(listed.some(a => a.name === NAME), 'actions.list')

  const result = await ow.actions.invoke({ name: NAME, params: { name: 'Ada' }, blocking: true, result: true })
  check(result.greeting === 'hi Ada', 'blocking invoke with result')
  const record = await ow.actions.invoke({ name: NAME, blocking: true })
  check(record.response.success === true && record.response.result.greeting === 'hi world', 'blocking invoke record')
  check(/^[0-9a-f]{32}$/.test(record.activationId), 'activation id format')

  const accepted = await ow.actions.invoke({ name: NAME, params: { name: 'async' } })
  check(typeof accepted.activationId === 'string' && !accepted.response, 'non-blocking invoke returns an id')
  const done = await waitActivation(accepted.activationId)
  check(done.response.result.greeting === 'hi async', 'activations.get')
  const logs = await ow.activations.logs({ name: accepted.activationId })
  check(logs.logs.length === 1 && logs.logs[0].endsWith('stdout: hello from async'), 'activations.logs')
  const res = await ow.activations.result({ name: accepted.activationId })
  check(res.success === true && res.result.greeting === 'hi async', 'activations.result')
  const acts = await ow.activations.list({ name: NAME, limit: 2 })
  check(acts.length === 2 && acts[0].activationId === accepted.activationId && acts[0].logs === undefined, 'activations.list')
  const docs = await ow.activations.list({ name: NAME, limit: 1, docs: true })
  check(docs[0].response.result.greeting === 'hi async', 'activations.list docs=true')

  await ow.actions.update({ name: 'js-fail', action: "def main(args):\n    return {'error': 'nope'}\n", kind: 'python:3' })
  const failed = await expectStatus(ow.actions.invoke({ name: 'js-fail', blocking: true }), 502, 'application error')
  check(failed.error.response.result.error === 'nope', 'application error record')
  await expectStatus(ow.actions.invoke({ name: 'js-missing', blocking: true }), 404, 'unknown action')

  // triggers and rules
  await ow.triggers.delete({ name: 'js-trigger' }).catch(() => {})
  await ow.triggers.create({ name: 'js-trigger', trigger: { parameters: [{ key: 'name', value: 'trigger' }] } })
  await ow.rules.create({ name: 'js-rule', trigger: 'js-trigger', action: NAME })
  const fired = await ow.triggers.invoke({ name: 'js-trigger' })
  check(typeof fired.activationId === 'string' && fired.activationIds.length === 1, 'triggers.invoke')
  const caused = await waitActivation(fired.activationIds[0])
  check(caused.response.result.greeting === 'hi trigger' && caused.cause === fired.activationId, 'rule activation')
  await ow.rules.disable({ name: 'js-rule' })
  check((await ow.rules.get({ name: 'js-rule' })).status === 'inactive', 'rules.disable')
  await ow.rules.enable({ name: 'js-rule' })
  check((await ow.rules.list()).some(r => r.name === 'js-rule' && r.status === 'active'), 'rules.enable + list')
  await ow.rules.delete({ name: 'js-rule' })
  await ow.triggers.delete({ name: 'js-trigger' })
  check(!(await ow.triggers.list()).some(t => t.name === 'js-trigger'), 'triggers.delete')

  await ow.actions.delete({ name: NAME })
  await ow.actions.delete({ name: 'js-fail' })
  await expectStatus(ow.actions.get({ name: NAME }), 404, 'get after delete')

  await sequences()
  await packages()
  await feeds()

  console.log(`ALL OK (${checks} checks)`)
}

const ADD = "def main(args):\n    return {'n': args.get('n', 0) + 1}\n"
const ECHO = 'def main(args):\n    return dict(args)\n'

async function sequences () {
  await ow.actions.update({ name: 'js-add', action: ADD, kind: 'python:3' })
  const seq = await ow.actions.update({ name: 'js-seq', sequence: ['/_/js-add', '/_/js-add', '/whisk.system/utils/echo'] })
  check(seq.exec.kind === 'sequence' && seq.exec.components[0] === '/guest/js-add' && seq.version === '0.0.1', 'sequence create')
  const record = await ow.actions.invoke({ name: 'js-seq', params: { n: 1 }, blocking: true })
  check(record.response.result.n === 3 && record.logs.length === 3, 'sequence blocking invoke: result and component ids')
  const first = await waitActivation(record.logs[0])
  check(first.cause === record.activationId && first.response.result.n === 2, 'sequence component record')
  const accepted = await ow.actions.invoke({ name: 'js-seq', params: { n: 10 } })
  check((await waitActivation(accepted.activationId)).response.result.n === 12, 'sequence non-blocking invoke')
  check((await ow.actions.get({ name: 'js-seq' })).exec.components.length === 3, 'sequence get')
  await ow.actions.update({ name: 'js-fail2', action: "def main(args):\n    return {'error': 'no'}\n", kind: 'python:3' })
  await ow.actions.update({ name: 'js-seq-fail', sequence: ['/_/js-add', '/_/js-fail2', '/_/js-add'] })
  const failed = await expectStatus(ow.actions.invoke({ name: 'js-seq-fail', blocking: true }), 502, 'failing sequence')
  check(failed.error.response.result.error === 'no' && failed.error.logs.length === 2, 'a failure stops the sequence')
  await expectStatus(ow.actions.create({ name: 'js-seq-bad', sequence: ['/_/js-nothing'] }), 400, 'missing component')
  for (const name of ['js-seq', 'js-seq-fail', 'js-fail2', 'js-add']) await ow.actions.delete({ name })
}

async function packages () {
  const pkg = await ow.packages.update({ name: 'js-pkg', package: { parameters: [{ key: 'a', value: 'pkg' }, { key: 'b', value: 'pkg' }] } })
  check(pkg.name === 'js-pkg' && pkg.version === '0.0.1' && pkg.publish === false, 'packages.create')
  await ow.actions.update({ name: 'js-pkg/echo', action: ECHO, kind: 'python:3', params: { b: 'action' } })
  const got = await ow.packages.get({ name: 'js-pkg' })
  check(got.actions.length === 1 && got.actions[0].name === 'echo', 'packages.get lists its actions')
  check((await ow.packages.list()).some(p => p.name === 'js-pkg'), 'packages.list')
  const res = await ow.actions.invoke({ name: 'js-pkg/echo', params: { c: 'invoke' }, blocking: true, result: true })
  check(res.a === 'pkg' && res.b === 'action' && res.c === 'invoke', 'package parameters under the action\'s')
  await ow.packages.update({ name: 'js-bind', package: { binding: { namespace: '_', name: 'js-pkg' }, parameters: [{ key: 'a', value: 'binding' }] } })
  const bound = await ow.actions.invoke({ name: 'js-bind/echo', blocking: true, result: true })
  check(bound.a === 'binding' && bound.b === 'action', 'binding parameters')
  await expectStatus(ow.packages.delete({ name: 'js-pkg' }), 409, 'delete a package with actions')
  const echo = await ow.actions.invoke({ name: '/whisk.system/utils/echo', params: { x: 1 }, blocking: true, result: true })
  check(echo.x === 1, 'the system catalog: /whisk.system/utils/echo')
  const system = await ow.packages.list({ namespace: 'whisk.system' })
  check(system.map(p => p.name).join() === 'alarms,utils', 'published packages of whisk.system')
  await expectStatus(ow.packages.get({ name: '/whisk.system/alarmsWeb' }), 403, 'unpublished package of another namespace')
  await ow.packages.update({ name: 'js-utils', package: { binding: { namespace: 'whisk.system', name: 'utils' } } })
  const sorted = await ow.actions.invoke({ name: 'js-utils/sort', params: { lines: ['b', 'a'] }, blocking: true, result: true })
  check(sorted.lines.join() === 'a,b' && sorted.length === 2, 'a binding of /whisk.system/utils')
  await expectStatus(ow.actions.update({ name: '/whisk.system/utils/echo', action: ECHO, kind: 'python:3' }), 403, 'whisk.system is read-only')
}

async function feeds () {
  await ow.triggers.update({ name: 'js-once', trigger: { annotations: [{ key: 'feed', value: '/whisk.system/alarms/once' }] } })
  await ow.rules.update({ name: 'js-once-rule', trigger: 'js-once', action: 'js-pkg/echo' })
  const date = new Date(Date.now() + 1500).toISOString()
  const made = await ow.feeds.create({ name: '/whisk.system/alarms/once', trigger: 'js-once', params: { date, trigger_payload: { from: 'alarm' } } })
  check(made.response.success === true, 'feeds.create (lifecycleEvent CREATE)')
  const read = await ow.feeds.get({ name: '/whisk.system/alarms/once', trigger: 'js-once' })
  check(read.response.result.config.date !== undefined && read.response.result.status.active === true, 'feeds.get (READ)')
  let fired = []
  for (let i = 0; i < 200 && fired.length === 0; i++) {
    await sleep(100)
    const acts = await ow.activations.list({ name: 'js-pkg/echo', docs: true, limit: 5 })
    fired = acts.filter(a => a.response.result.from === 'alarm')
  }
  check(fired.length === 1 && fired[0].response.result.a === 'pkg', 'the once alarm fired the trigger, its rule ran the action')
  await ow.feeds.delete({ name: '/whisk.system/alarms/once', trigger: 'js-once' })

  await ow.triggers.update({ name: 'js-interval', trigger: { annotations: [{ key: 'feed', value: '/whisk.system/alarms/interval' }] } })
  await ow.feeds.create({ name: '/whisk.system/alarms/interval', trigger: 'js-interval', params: { minutes: 1 } })
  await ow.feeds.update({ name: '/whisk.system/alarms/interval', trigger: 'js-interval', params: { minutes: 3 } })
  const config = (await ow.feeds.get({ name: '/whisk.system/alarms/interval', trigger: 'js-interval' })).response.result.config
  check(config.minutes === 3, 'feeds.update (UPDATE)')
  await ow.feeds.delete({ name: '/whisk.system/alarms/interval', trigger: 'js-interval' })
  await expectStatus(ow.feeds.get({ name: '/whisk.system/alarms/interval', trigger: 'js-interval' }), 502, 'READ after DELETE')

  await ow.rules.delete({ name: 'js-once-rule' })
  await ow.triggers.delete({ name: 'js-once' })
  await ow.triggers.delete({ name: 'js-interval' })
  await ow.packages.delete({ name: 'js-bind' })
  await ow.packages.delete({ name: 'js-utils' })
  await ow.actions.delete({ name: 'js-pkg/echo' })
  await ow.packages.delete({ name: 'js-pkg' })
}

main().catch(err => {
  console.error('FAILED:', err && err.stack ? err.stack : err)
  process.exit(1)
})
